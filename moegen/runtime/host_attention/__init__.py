"""Attention beside the device (--cpu-attention): decode attention for a share of each step's sequences on
host threads, straight over the paged host KV cache. `attend`: the host's computation (the model's attention
core over a micro-batch's blocks); `worker`: one host-attended micro-batch end to end, device projections, the
two copies and the host worker. The planner chooses the share when the user leaves it unset (`planner.host_profile`, `planner.cost`)."""
