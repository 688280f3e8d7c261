"""Where a request runs: the router, the fleet-wide queue and what the strategies learn
(the prefix index over conversations, prompt hash chains, learned rates per node and model)."""
