package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/spf13/cobra"
)

func eventsCmd(cl *client) *cobra.Command {
	var (
		vm, since, severity, kind string
		limit                     int
	)
	c := &cobra.Command{
		Use:   "events [--vm N] [--since T] [--severity S] [--kind K] [--limit N]",
		Short: "List the events VMs reported (monitor alerts, heartbeats), newest first",
		Long: `events lists the events VMs posted to POST /v1/events, newest first.

--since takes an RFC 3339 time or a duration back from now (90m, 24h).
--severity warning lists warning and critical events; critical lists only
those. Warning and critical events are also in the audit chain, as "alert"
records naming the event's id.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			q := url.Values{}
			for k, v := range map[string]string{"vm": vm, "since": since, "severity": severity, "kind": kind} {
				if v != "" {
					q.Set(k, v)
				}
			}
			q.Set("limit", strconv.Itoa(limit))
			b, err := cl.call("GET", "/v1/admin/events?"+q.Encode(), nil)
			if err != nil {
				return fmt.Errorf("events: %w", err)
			}
			return cl.print(c, b, printEvents(b))
		},
	}
	f := c.Flags()
	f.StringVar(&vm, "vm", "", "only this VM's events")
	f.StringVar(&since, "since", "", "only events received since this RFC 3339 time or duration ago")
	f.StringVar(&severity, "severity", "", "only events of this severity or above: info, warning or critical")
	f.StringVar(&kind, "kind", "", "only events of this kind (heartbeat, ptrace_attach, proc_mem, …)")
	f.IntVar(&limit, "limit", api.DefaultEventList, "at most this many events (1-1000)")
	return c
}

// printEvents prints one line per event: when, VM, severity, kind, and
// what the monitor saw.
func printEvents(body []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		var evs []api.EventRecord
		if err := json.Unmarshal(body, &evs); err != nil {
			return err
		}
		if len(evs) == 0 {
			_, err := fmt.Fprintln(w, "no events")
			return err
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tRECEIVED\tVM\tSEVERITY\tKIND\tDETAILS")
		for _, e := range evs {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", e.ID, e.Received.Local().Format(time.DateTime), e.VM, e.Severity, e.Kind, eventDetails(e.Event))
		}
		return tw.Flush()
	}
}

func eventDetails(e api.Event) string {
	var parts []string
	if e.PID != 0 || e.Comm != "" {
		who := fmt.Sprintf("by pid %d", e.PID)
		if e.Comm != "" {
			who += " (" + e.Comm + ")"
		}
		if e.Exe != "" {
			who += " " + e.Exe
		}
		if e.UID != nil {
			who += fmt.Sprintf(" uid %d", *e.UID)
		}
		parts = append(parts, who)
	}
	if e.TargetPID != 0 {
		parts = append(parts, fmt.Sprintf("on pid %d", e.TargetPID))
	}
	if e.Path != "" {
		parts = append(parts, "path "+strconv.Quote(e.Path))
	}
	if e.Addr != 0 || e.Len != 0 {
		parts = append(parts, fmt.Sprintf("addr %#x+%d", e.Addr, e.Len))
	}
	if e.Overlap {
		parts = append(parts, "key pages")
	}
	if e.Result != nil {
		parts = append(parts, fmt.Sprintf("result %d", *e.Result))
	}
	if e.Denied {
		parts = append(parts, "denied")
	}
	if e.Mode != "" {
		parts = append(parts, "mode "+e.Mode)
	}
	if e.Message != "" {
		parts = append(parts, strconv.Quote(e.Message))
	}
	return strings.Join(parts, ", ")
}
