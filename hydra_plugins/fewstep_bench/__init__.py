"""fewstep-bench's Hydra plugins: Hydra loads launchers only from the ``hydra_plugins`` namespace
package (its plugin discovery), so the plan-aware launchers live here (``launchers.py``)."""
