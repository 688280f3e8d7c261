"""Who is asking: tenants and their keys, limits and budgets, usage and its record, and
the fair-share policy the fleet-wide queue asks "who goes next". It may import the core
only; the gateway and the admin routes use it."""
