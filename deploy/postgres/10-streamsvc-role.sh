#!/bin/sh
# The service's own PostgreSQL roles: a login that is not a superuser, cannot create roles or
# databases, and owns only the service's database (so `streamsvc migrate` can create its
# tables there, and the flushers their temporary functions); and the NOLOGIN role callers'
# statements run as (docs/caller-role.md), which the login is a member of and
# `streamsvc migrate` grants the allow-list's privileges to. The postgres image runs this
# once, when it initialises an empty data directory (compose.yaml mounts it); elsewhere run
# it as a superuser with the same variables:
#   POSTGRES_USER=postgres POSTGRES_DB=streamsvc SERVICE_DB_USER=streamsvc \
#   SERVICE_DB_PASSWORD=... CALLER_DB_ROLE=streamsvc_caller sh deploy/postgres/10-streamsvc-role.sh
# Target tables created by someone else need their grants too (README, "Least privilege").
set -eu
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=role="$SERVICE_DB_USER" --set=password="$SERVICE_DB_PASSWORD" \
    --set=db="$POSTGRES_DB" --set=caller="${CALLER_DB_ROLE:-streamsvc_caller}" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- Roles are the cluster's: another database's service may have created it already.
SELECT format('CREATE ROLE %I NOLOGIN', :'caller')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'caller') \gexec
GRANT :"caller" TO :"role";
ALTER DATABASE :"db" OWNER TO :"role";
ALTER SCHEMA public OWNER TO :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
