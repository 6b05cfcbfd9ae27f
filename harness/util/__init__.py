"""The ground floor: helpers that import nothing else of the harness (atomic writes, where the
configs are, the console, DDP ranks, the error types, run ids, seeding, step profiles, whether W&B
can authenticate)."""
