"""flowerftg: a Flower / PyTorch app on scikit-learn's digits, with FedFTG added to FedAvg."""
