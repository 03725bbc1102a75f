"""The `thermoscope` command: the collector, attach/detach, events, plot, theory, demo, loadgen,
hash-password.

Each verb lives in a module of its own; `main` parses the command line and imports a verb's
module only when it runs, so `thermoscope collector` never imports torch or matplotlib.
"""
