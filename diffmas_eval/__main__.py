from diffmas_eval.cli import main

main()
