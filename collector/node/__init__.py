"""The node side of a large job: a node's aggregator, which pre-merges its ranks' frames into
one node frame per step for the job's collector (`aggregator`), and its Ray actor (`actor`)."""
