"""The plugin system: the pluggy manager (``manager``), its hooks (``hookspecs``) and the variant
registry (``registry``). The backend registry is ``engine.backends.registry``."""
