"""flowerftg: a Flower ServerApp; FedAvg, with FedFTG's server step after each aggregation."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedftg.flower import FTGStrategy, run_config_settings
from flowerftg.task import INPUT_SHAPE, NUM_CLASSES, Net, load_test, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the global model on the server's test set."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = test(model, *load_test())
    return MetricRecord({"accuracy": acc, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg + FTG for ``num-server-rounds`` rounds and save the final model."""
    cfg = context.run_config
    torch.manual_seed(0)
    strategy = FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=2,
        min_evaluate_nodes=2,
        min_available_nodes=2,
    )
    # FTG: wrap the strategy; settings come from the run config's ftg-* keys
    strategy = FTGStrategy(
        strategy,
        model=Net,
        num_classes=NUM_CLASSES,
        input_shape=INPUT_SHAPE,
        settings=run_config_settings(cfg),
        evaluate_fn=central_evaluate,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), str(cfg["model-path"]))
