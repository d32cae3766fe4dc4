"""What every federated method shares: the local-training loop and its terms, the
vectorised client path, aggregation, client selection, teacher weighting, and the
protocols and specs of client methods and server plug-ins."""
