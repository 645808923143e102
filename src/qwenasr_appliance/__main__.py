from qwenasr_appliance.cli import main

raise SystemExit(main())
