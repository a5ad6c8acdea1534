"""specfed-flwr: federated speculative LLM inference on Flower.

Edge devices draft with a small model and send top-K sparse distributions; the server
reconstructs, aggregates with bias-aware weights, verifies on the target and broadcasts
the accepted tokens. See README.md and docs/DESIGN.md.
"""

__version__ = "0.1.0"
