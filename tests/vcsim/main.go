// vcsim for the vcenter source's tests: govmomi's vCenter simulator (a VPX model) over plain
// HTTP (or https with -tls) on the given address. Prints the SDK URL once it listens, serves
// until killed.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	user := flag.String("username", "", "the only accepted user (empty: any non-empty login)")
	pass := flag.String("password", "", "its password")
	useTLS := flag.Bool("tls", false, "serve https with a self-signed localhost certificate")
	flag.Parse()

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	if *useTLS {
		model.Service.TLS = new(tls.Config) // httptest's built-in self-signed certificate
	}
	model.Service.Listen = &url.URL{Host: *listen}
	if *user != "" {
		model.Service.Listen.User = url.UserPassword(*user, *pass)
	}
	server := model.Service.NewServer()
	fmt.Printf("VCSIM_URL=%s\n", server.URL)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	server.Close()
	model.Remove()
}
