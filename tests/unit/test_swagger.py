from streamsvc.api.swagger import as_openapi_30


def test_openapi_31_is_written_the_30_way_for_swagger_ui_4() -> None:
    document = {
        "openapi": "3.1.0",
        "components": {
            "schemas": {
                "Op": {
                    "properties": {
                        "id": {"type": ["string", "null"]},
                        "meta": {
                            "oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Meta"}]
                        },
                        "kind": {"const": "insert"},
                        "any": {"type": ["integer", "string"]},
                    }
                }
            }
        },
    }
    converted = as_openapi_30(document)
    props = converted["components"]["schemas"]["Op"]["properties"]
    assert converted["openapi"] == "3.0.3"
    assert props["id"] == {"type": "string", "nullable": True}
    assert props["meta"] == {"oneOf": [{"$ref": "#/components/schemas/Meta"}], "nullable": True}
    assert props["kind"] == {"enum": ["insert"]}
    assert props["any"] == {"oneOf": [{"type": "integer"}, {"type": "string"}]}
    assert document["openapi"] == "3.1.0", "the served 3.1 document is left alone"
