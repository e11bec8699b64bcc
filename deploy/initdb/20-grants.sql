-- Runs once, after the schema (10-seckill.sql): the application role may read and write the
-- seckill tables, and do nothing else.
GRANT USAGE ON SCHEMA public TO seckill;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO seckill;
