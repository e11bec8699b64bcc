-- Buys of made-up items of one sale (docs/testers.md): how much a flood of unknown (sale, item)
-- pairs costs the engine. Each request is one of the users whose tokens are in $TOKENS (one per
-- line; the per-user limit applies to each), for a random item id of sale $SALE.
--
--   for i in $(seq 1 1000); do target/release/seckill token --config .seckill-dev/shards.toml \
--     --user $((900000000 + i)); done > /tmp/tokens.txt
--   TOKENS=/tmp/tokens.txt SALE=<a sale id> wrk -t2 -c50 -d30s -s bench/wrk/randids.lua \
--     http://127.0.0.1:8080
local tokens = {}
for line in io.lines(os.getenv("TOKENS") or "/tmp/tokens.txt") do tokens[#tokens + 1] = line end
local sale = os.getenv("SALE")
math.randomseed(os.time())

request = function()
  local item = math.random(1, 2 ^ 40)
  local token = tokens[math.random(1, #tokens)]
  return wrk.format("POST", "/v1/sales/" .. sale .. "/items/" .. item .. "/orders",
    { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" },
    '{"quantity": 1}')
end
