-- The read-only role cannot take the database down.
--
-- llmbatch_reader (`llmbatch sql`, users' psql) reads every table, so it sees
-- every prompt and answer; what it must not do is starve the pipeline. Without
-- limits, 200 reader sessions of pg_sleep took every connection slot (status,
-- doctor and submit failed), and a session that turned read-only off wrote a
-- 269 MB temporary table. So, on the role:
--   CONNECTION LIMIT 20      max_connections is 200 (infra/stack.sh, docker-compose.yml):
--                            3 superuser-reserved + 20 reader leave 177 that only the
--                            pipeline's role can take (Postgres 15 has no reserved_connections)
--   statement_timeout 30s    a runaway query is cancelled (a session may SET a longer one:
--                            the connection limit is what bounds the harm)
--   idle_in_transaction_session_timeout 60s   an open transaction does not hold locks and a slot
--   temp_file_limit 256MB    sorts and hashes cannot fill the disk (superuser-only: no session can lift it)
-- and no TEMP on the database for anyone but its owner (TEMP is PUBLIC's by default).
-- infra/stack.sh applies this file as the superuser before the migrations run
-- (the stack's pipeline role may not alter roles); docker compose migrates as the superuser.
-- (no percent signs here: the driver would read them as placeholders)
DO $$
DECLARE
    may_manage boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user);
    db text := quote_ident(current_database());
    owner text := quote_ident((SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()));
BEGIN
    EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || db || ' FROM PUBLIC';
    EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || db || ' FROM llmbatch_reader';
    EXECUTE 'GRANT TEMPORARY ON DATABASE ' || db || ' TO ' || owner;
    IF may_manage THEN
        ALTER ROLE llmbatch_reader CONNECTION LIMIT 20;
        ALTER ROLE llmbatch_reader SET statement_timeout = '30s';
        ALTER ROLE llmbatch_reader SET idle_in_transaction_session_timeout = '60s';
        ALTER ROLE llmbatch_reader SET temp_file_limit = '256MB';
        ALTER ROLE llmbatch_reader SET default_transaction_read_only = on;
    ELSIF (SELECT rolconnlimit FROM pg_roles WHERE rolname = 'llmbatch_reader') < 0
            OR NOT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                           WHERE r.rolname = 'llmbatch_reader' AND s.setdatabase = 0
                             AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c WHERE starts_with(c, 'temp_file_limit='))) THEN
        RAISE EXCEPTION USING
            MESSAGE = 'llmbatch_reader has no connection limit or temp_file_limit, and ' || current_user
                      || ' may not alter roles',
            HINT = 'as a superuser, in this database: \i sql/016_reader_limits.sql; then llmbatch db upgrade';
    END IF;
END
$$;
