"""The built-in attention variants. Each module is a plugin, registered like any external one."""
