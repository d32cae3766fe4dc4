"""The specs of the server plug-ins: one torch-free module each, holding the plug-in's
settings dataclass and its ``PLUGIN`` spec (`fedftg.fl.specs.PluginSpec`), by the rule of
`fedftg.methods.specs`."""
