module github.com/vhost-vhdx/vhost-vhdx

go 1.26.8

require (
	github.com/google/uuid v1.6.0 // indirect
	github.com/sirupsen/logrus v1.10.2 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
