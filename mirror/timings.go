package mirror

import (
	"github.com/prometheus/client_golang/prometheus"

	"slipway/upstream"
)

// Observer keeps the histograms of what upstream reports as it happens
// (fills, requests to upstreams). It implements upstream.Observer: cmd makes
// one, hands it to the Filler and every upstream Client, and to the Server
// in Config.Observer, which registers it.
type Observer struct {
	fills            *prometheus.CounterVec   // result
	fillDuration     *prometheus.HistogramVec // from
	fillFirstByte    *prometheus.HistogramVec // from
	upstreamDuration *prometheus.HistogramVec // upstream
}

// NewObserver returns an Observer with nothing observed yet.
func NewObserver() *Observer {
	o := &Observer{
		fills:            mFills.counterVec(),
		fillDuration:     mFillDuration.histogramVec(),
		fillFirstByte:    mFillFirstByte.histogramVec(),
		upstreamDuration: mUpstreamDuration.histogramVec(),
	}
	// Both results exist from the start, so that a rate of failures is 0
	// rather than absent before the first one.
	o.fills.WithLabelValues("success")
	o.fills.WithLabelValues("failure")
	return o
}

// ObserveFill counts a fill that ended; a successful one also goes into the
// duration and first-byte histograms (a failed one's times say more about
// how it failed than about how long fills take).
func (o *Observer) ObserveFill(r upstream.FillReport) {
	if r.Err != nil {
		o.fills.WithLabelValues("failure").Inc()
		return
	}
	o.fills.WithLabelValues("success").Inc()
	o.fillDuration.WithLabelValues(r.From).Observe(r.Duration.Seconds())
	if r.FirstByte > 0 {
		o.fillFirstByte.WithLabelValues(r.From).Observe(r.FirstByte.Seconds())
	}
}

// ObserveUpstreamRequest records one request's time to its response headers.
// The upstream label is a configured upstream's host, so its values are
// bounded by the configuration.
func (o *Observer) ObserveUpstreamRequest(r upstream.RequestReport) {
	o.upstreamDuration.WithLabelValues(r.Upstream).Observe(r.Duration.Seconds())
}
