# streamsvc's front door: `just` lists the recipes.
# Every recipe first makes sure .venv exists and holds the project (see `setup`).

set shell := ["bash", "-euo", "pipefail", "-c"]
# The service reads .env itself (streamsvc.settings.load); just must not load it too.
set dotenv-load := false
# Extra arguments reach commands as "$@", so quoted arguments keep their spaces
# (e.g. `just test -k "batch and not slow"`).
set positional-arguments := true

venv := ".venv"
stamp := venv / ".pyproject.sha256"

# List the recipes
default:
    @{{ just_executable() }} --justfile {{ quote(justfile()) }} --list

# Create .venv when missing; reinstall '.[dev]' only when pyproject.toml changed
[private]
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [[ ! -x {{ venv }}/bin/python ]]; then
        echo "setup: creating {{ venv }}" >&2
        rm -rf {{ venv }}
        python3 -m venv {{ venv }}
        rm -f {{ stamp }}
    fi
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    have="$(cat {{ stamp }} 2>/dev/null || true)"
    if [[ "$want" != "$have" ]]; then
        echo "setup: installing -e '.[dev]' into {{ venv }} (pyproject.toml changed)" >&2
        log="$(mktemp)"
        trap 'rm -f "$log"' EXIT
        if ! {{ venv }}/bin/python -m pip install --quiet --disable-pip-version-check \
                -e '.[dev]' >"$log" 2>&1; then
            cat "$log" >&2
            echo "setup: pip install -e '.[dev]' failed" >&2
            exit 1
        fi
        echo "$want" > {{ stamp }}
    fi

# Create .env from .env.example with a fresh random API_KEY_ENCRYPTION_SECRET, once
[private]
env-file:
    #!/usr/bin/env bash
    set -euo pipefail
    if [[ -e .env || ! -e .env.example ]]; then exit 0; fi
    secret="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
    sed "s|^API_KEY_ENCRYPTION_SECRET=.*|API_KEY_ENCRYPTION_SECRET=$secret|" .env.example > .env
    chmod 600 .env
    echo "run: created .env from .env.example with a random API_KEY_ENCRYPTION_SECRET;" \
        "set STREAMSVC_ALLOWED_TABLES there to allow your tables" >&2

# Migrate the database, then run the service (e.g. `just run --role flusher`)
run *ARGS: setup env-file
    .venv/bin/streamsvc migrate
    exec .venv/bin/streamsvc run "$@"

# Run the test suite (arguments go to pytest)
test *ARGS: setup
    .venv/bin/pytest "$@"

# The fault suite at full size: 50,000 operations a scenario, 30 kills, RabbitMQ away 60 s
# (`just test` runs each scenario small); prints the table of what each scenario did
faults *ARGS: setup
    STREAMSVC_FAULTS=full .venv/bin/pytest tests/e2e/test_faults.py -s -p no:randomly "$@"

# Ten minutes of steady mixed load (1,000 ops/s); RSS and connections sampled every 10 s
# must stay flat (`just test` runs half a minute of it)
soak *ARGS: setup
    .venv/bin/python -m benchmarks.soak "$@"

# Where each service process spends its CPU under a fixed offered rate (py-spy), e.g.
# `just profile --ingress rpc-single --rate 500` (docs/efficiency.md)
profile *ARGS: setup
    .venv/bin/python -m benchmarks.profile "$@"

# ruff check, ruff format --check, mypy
lint: setup
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy

# Format the code and apply ruff's safe fixes
fmt: setup
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .

# Run the end-to-end benchmark (arguments go to `python -m benchmarks`)
bench *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    # The broker ceiling runs the callers' own AMQP client (Node amqplib) where node is.
    if command -v npm >/dev/null && [[ ! -d tests/nestjs/node_modules ]]; then
        echo "bench: installing tests/nestjs's packages (npm ci) for the broker ceiling" >&2
        npm ci --prefix tests/nestjs --no-audit --no-fund >/dev/null
    fi
    .venv/bin/python -m benchmarks "$@"

# Create or upgrade the service's own tables
migrate: setup
    .venv/bin/streamsvc migrate

# Renew the console's screenshots in docs/console/ (needs chromium and the local servers)
console-screenshots: setup
    STREAMSVC_CONSOLE_SHOTS=docs/console .venv/bin/pytest -q tests/e2e/test_console_browser.py
