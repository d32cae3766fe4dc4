"""The specs of the client methods and server plug-ins: one torch-free module each.

A module here holds a method's or plug-in's settings dataclass and its ``METHOD`` /
``PLUGIN`` spec (`fedftg.registry`); its factories import the implementation (the module of
the same name in `fedftg.methods`, which needs torch) only when a run builds it. So the
registry, the config, the flags and their help load without torch, and commands that need
no tensors (``--help``, ``presets``, ``--print-config``, bad input) answer at once.
"""
