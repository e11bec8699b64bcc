-- Runs once, when a master's data volume is created (after 06-failover-role.sh), as the superuser,
-- in the database `seckill`; tests/deploy.rs runs the same file. What the engine's health monitor
-- does in built-in failover mode, and nothing more (PostgreSQL 15):
-- see replication (pg_stat_replication, pg_stat_wal_receiver) and the settings;
GRANT pg_monitor TO seckill_failover;
-- promote a shadow, and reload the configuration after a change;
GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO seckill_failover;
GRANT EXECUTE ON FUNCTION pg_reload_conf() TO seckill_failover;
-- fence an old master (read-only), keep synchronous replication and the replication timeouts in
-- line with [failover] (ALTER SYSTEM of exactly these settings);
GRANT ALTER SYSTEM ON PARAMETER default_transaction_read_only, synchronous_standby_names,
    wal_sender_timeout, wal_receiver_timeout, wal_retrieve_retry_interval TO seckill_failover;
-- read the tables the migrations make (a move's pre-check compares schema versions).
ALTER DEFAULT PRIVILEGES FOR ROLE seckill_admin IN SCHEMA public GRANT SELECT ON TABLES TO seckill_failover;
