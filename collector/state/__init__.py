"""State: the jobs and runs held in memory, their pipelines, and the store that makes them durable."""
