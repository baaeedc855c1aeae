"""Settings: the run spec users type (data, network, recipe, devices) and the named recipes."""
