"""fedftg: FedFTG (CVPR 2022) and the standard federated client methods, on one engine."""

__version__ = "0.1.0"
