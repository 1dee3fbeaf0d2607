"""The main job: the stage table (stages.py), presets as data (presets.py), the runner (run.py), the
evaluation of every stage (evaluate.py) and the report (report/). Import the submodule you need: this
package's own import stays torch-free, so the CLI's --help can read the stage table and preset names."""
