"""flowerftg: a Flower ServerApp; FedAvg, with FedFTG's server step after each aggregation."""

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedftg.flower import FTGStrategy, run_config_settings
from flowerftg.task import INPUT_SHAPE, NUM_CLASSES, Net, load_test, test

app = ServerApp()


def model_path(value: str) -> Path | None:
    """Where the final model goes: None for "" (not saved). A relative path is refused: the
    ServerApp runs in the SuperLink's working directory, not in the folder of `flwr run`."""
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"model-path must be an absolute path, got {value!r} (the ServerApp runs in the "
            "SuperLink's working directory): pass --run-config \"model-path='$PWD/final_model.pt'\""
        )
    return path


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
    path = model_path(str(cfg["model-path"]))  # checked before any round
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
    if path is not None:
        torch.save(result.arrays.to_torch_state_dict(), path)
        logging.getLogger("flwr").info("final model saved to %s", path)
