"""The command line: the `bnsurgery` group, its shared options and one module per command.

The only layer that speaks in flags: library errors name parameters (`option="prior"`), and
`cli.main` turns them into `--prior`."""
