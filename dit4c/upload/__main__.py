from dit4c.upload.helper import main

main()
