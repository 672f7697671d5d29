"""A package only so that Hydra finds the installed configs as pkg://personafuse.conf."""
