"""Server plug-ins, run after aggregation each round: FedFTG (`ftg`), FedDF (`feddf`) and
FedGen (`fedgen`); `distill` is the data-free generator distillation FedFTG and FedDF share."""
