"""The wire: the gRPC contract's shared names (`contract`) and the codec between `Sample`s and
its messages (`codec`). Both the agent and the collector import it; it imports neither."""
