from detox_exp.cli import main

main()
