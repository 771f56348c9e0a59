"""Layer 7, the planner: `quantkit plan`'s estimates of time, memory and disk (planner), measured in child
processes that run the CLI. Above the CLI in rank: no quantize run imports it."""
