"""Where a request runs: the router, the fleet-wide queue and what the strategies learn
(the prefix index over conversations, prompt hash chains, learned rates per node and
model). It may import the core, tenancy's fair-share policy, and of the gateway only the
fleet."""
