"""The specs of the client methods: one torch-free module each.

A module here holds a method's settings dataclass and its ``METHOD`` spec
(`fedftg.fl.specs.MethodSpec`); its factory imports the implementation (the module of the
same name in `fedftg.methods`, which needs torch) only when a run builds it. So the
registry, the config, the flags and their help load without torch, and commands that need
no tensors (``--help``, ``presets``, ``--print-config``, bad input) answer at once. The
server plug-ins' specs live in `fedftg.plugins.specs`, by the same rule.
"""
