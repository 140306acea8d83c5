"""Multi-GPU serving: tensor parallel attention / dense MLP and expert parallel MoE.

- `parallel`: the process group, rank / world helpers, all_reduce (a no-op at world size 1).
- `sharding`: which slice of every weight a rank holds (checkpoint names and our parameters).
- `worker`: ranks 1..N-1, which replay every step rank 0 schedules, and the rank-0 side
  (`DistributedModelRunner`, `WorkerGroup`) that ships the steps to them.

Importing this package stays cheap: `worker` (which imports the engine) is imported on use.
"""
