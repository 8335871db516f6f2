"""Built-in benchmarks run from the command line (`alignlab bench NAME`): they drive whole pipelines."""
