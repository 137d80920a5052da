from impflow.train.cli import main

raise SystemExit(main())
