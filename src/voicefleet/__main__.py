from voicefleet.cli.main import main

main()
