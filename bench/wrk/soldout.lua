-- Buys of one sold-out item (docs/testers.md): what a sold-out answer costs the engine, for
-- `bench/instructions.sh --script` (the bare server answers the same request 409 as well). Each
-- request is one of the users whose tokens are in $TOKENS (one per line), for item $ITEM of sale
-- $SALE.
--
--   for i in $(seq 1 200); do target/release/seckill token --config .seckill-dev/shards.toml \
--     --user $((5000 + i)); done > /tmp/tokens.txt
--   TOKENS=/tmp/tokens.txt SALE=<a sale id> ITEM=<its sold-out item> \
--     bench/instructions.sh --script bench/wrk/soldout.lua
local tokens = {}
for line in io.lines(os.getenv("TOKENS") or "/tmp/tokens.txt") do tokens[#tokens + 1] = line end
local path = "/v1/sales/" .. (os.getenv("SALE") or "1") .. "/items/" .. (os.getenv("ITEM") or "1")
  .. "/orders"
math.randomseed(os.time())

request = function()
  return wrk.format("POST", path,
    { ["Authorization"] = "Bearer " .. tokens[math.random(1, #tokens)],
      ["Content-Type"] = "application/json" },
    '{"quantity": 1}')
end
