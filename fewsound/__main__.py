from fewsound.cli import main

raise SystemExit(main())
