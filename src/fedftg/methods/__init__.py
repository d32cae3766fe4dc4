"""The client methods (FedProx, SCAFFOLD, FedDyn, MOON, FedNova; FedAvg is the plain
`fedftg.fl.client.ClientMethod`), one module each, with torch-free specs in `specs/`."""
