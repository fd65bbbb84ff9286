"""Swagger UI from the locally installed swagger-ui-bundle, which is Swagger UI 4: it renders
OpenAPI 3.0 only, while the service's document (/api/openapi.json) is OpenAPI 3.1. The page
therefore gets the same document written the 3.0 way; /api/openapi.json stays 3.1."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from litestar import Request
from litestar.openapi.plugins import SwaggerRenderPlugin

ASSETS_DIR = Path(swagger_ui_bundle.swagger_ui_path)


class LocalSwagger(SwaggerRenderPlugin):
    def __init__(self, *, path: str, assets: str) -> None:
        super().__init__(
            path=path,
            js_url=f"{assets}/swagger-ui-bundle.js",
            css_url=f"{assets}/swagger-ui.css",
            standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
            favicon=f'<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">',
        )

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, as_openapi_30(openapi_schema))


def as_openapi_30(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 ``document`` in 3.0 terms: nullable instead of "null" types."""
    converted = _convert(copy.deepcopy(document))
    converted["openapi"] = "3.0.3"
    return converted  # type: ignore[no-any-return]


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _convert(value) for key, value in node.items()}
    types = node.get("type")
    if isinstance(types, list):
        rest = [t for t in types if t != "null"]
        if len(rest) < len(types):
            node["nullable"] = True
        if len(rest) == 1:
            node["type"] = rest[0]
        else:
            del node["type"]
            if rest:
                node["oneOf"] = [{"type": t} for t in rest]
    for key in ("oneOf", "anyOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            options = [o for o in options if o != {"type": "null"}]
            node["nullable"] = True
            if len(options) == 1 and "$ref" not in options[0]:
                del node[key]
                node.update(options[0])
            else:
                node[key] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
    return node
