"""fedftg on Flower: a ClientApp, a ServerApp and the FedFTGStrategy (needs `fedftg[flower]`)."""
