"""seqserve: stateful sequence inference over gRPC.

`seqserve.v1` holds the generated protobuf code, `seqserve.client` the Python
client and `seqserve.server` the server.
"""

__version__ = "0.1.0"
