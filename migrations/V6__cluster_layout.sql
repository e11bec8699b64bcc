-- The routing layout a cluster runs with (strategies, slot maps, ranges, by group name), kept on
-- the config group: an engine whose configuration would route existing keys to other groups
-- refuses to start instead (README "Changing the layout").
CREATE TABLE cluster_layout (
    id         integer     PRIMARY KEY CHECK (id = 1),
    layout     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
