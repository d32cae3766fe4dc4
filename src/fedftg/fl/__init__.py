"""What every federated method shares: the local-training loop and its terms, the
vectorised client path, aggregation, client selection, teacher weighting, and the
protocols and specs of client methods and server plug-ins.

Two names hold across the package. `fedftg.fl.aggregation.State` (name -> tensor) is the one
alias for a state dict: a model's, a method's client or server state, a term's inputs
(`fedftg.models`, below this layer, spells it out). ``round_idx`` is the round index,
0-based, wherever code passes it; the 1-based number users see is ``round_num``, or the key
``"round"`` of a metrics record (Flower's own methods keep its ``server_round``, 1-based).
"""
