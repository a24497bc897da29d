package hsm

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want URI
		err  string // substring of the error; "" for success
	}{
		{in: "pkcs11:token=kg;object=master", want: URI{Token: "kg", Object: "master"}},
		{in: "PKCS11:object=m;token=kg", want: URI{Token: "kg", Object: "m"}},
		{in: "pkcs11:token=My%20Token;object=a%2Fb;type=secret-key;id=%01%02",
			want: URI{Token: "My Token", Object: "a/b", ID: []byte{1, 2}}},
		{in: "pkcs11:token=kg;object=m;serial=123;model=SoftHSM%20v2;manufacturer=SoftHSM;x-vendor=1?module-path=/usr/lib/x.so&pin-source=file:/etc/pin",
			want: URI{Token: "kg", Object: "m", Serial: "123", Model: "SoftHSM v2", Manufacturer: "SoftHSM", ModulePath: "/usr/lib/x.so", PINSource: "file:/etc/pin"}},
		{in: "token=kg;object=m", err: `does not start with "pkcs11:"`},
		{in: "pkcs11:object=m", err: "no token="},
		{in: "pkcs11:token=kg", err: "no object="},
		{in: "pkcs11:", err: "no token="},
		{in: "pkcs11:token=kg;object=m;token=x", err: "appears twice"},
		{in: "pkcs11:token=kg;objekt=m", err: `unknown path attribute "objekt"`},
		{in: "pkcs11:token=kg;object=m;type=private", err: "type=secret-key"},
		{in: "pkcs11:token=kg;object=m?pin-value=1234", err: "--pkcs11-pin-file"},
		{in: "pkcs11:token=kg;object=m?foo=1", err: "unknown query attribute"},
		{in: "pkcs11:token=kg;object=a b", err: "must be percent-encoded"},
		{in: "pkcs11:token=kg;object=a%2", err: "truncated percent-encoding"},
		{in: "pkcs11:token=kg;object=a%zz", err: "not a percent-encoded byte"},
		{in: "pkcs11:token=kg;object", err: "not name=value"},
		{in: "pkcs11:token=kg;Object=m", err: "only lower-case"},
	} {
		got, err := ParseURI(tc.in)
		if tc.err != "" {
			if !errors.Is(err, ErrURI) || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: got %v, want ErrURI saying %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if got.Token != tc.want.Token || got.Object != tc.want.Object || !bytes.Equal(got.ID, tc.want.ID) || got.Serial != tc.want.Serial ||
			got.Model != tc.want.Model || got.Manufacturer != tc.want.Manufacturer || got.ModulePath != tc.want.ModulePath || got.PINSource != tc.want.PINSource {
			t.Errorf("%q: got %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// FuzzParseURI: outside input (a flag value) never panics, and whatever
// parses names a token and an object and round-trips through encodeURI.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=kg;object=master", "pkcs11:token=My%20Token;object=a%2Fb;type=secret-key;id=%01%02",
		"pkcs11:token=kg;object=m?module-path=/usr/lib/x.so&pin-source=file:/etc/pin", "pkcs11:token=kg;object=a%2",
		"pkcs11:?", "pkcs11:;;", "PKCS11:token=%00;object=%ff", "pkcs11:token=kg;object=m;x-a=b?x-q=1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrURI) {
				t.Fatalf("error not ErrURI: %v", err)
			}
			return
		}
		if u.Token == "" || u.Object == "" {
			t.Fatalf("%q parsed without token or object: %+v", s, u)
		}
		back, err := ParseURI(encodeURI(u))
		if err != nil || back.Token != u.Token || back.Object != u.Object || !bytes.Equal(back.ID, u.ID) {
			t.Fatalf("%q: round trip through %q: %+v %v", s, encodeURI(u), back, err)
		}
	})
}

// encodeURI percent-encodes every byte of each value (test only).
func encodeURI(u URI) string {
	enc := func(s string) string {
		var b strings.Builder
		for i := 0; i < len(s); i++ {
			b.WriteString("%")
			b.WriteString(strings.ToUpper(string("0123456789abcdef"[s[i]>>4]) + string("0123456789abcdef"[s[i]&15])))
		}
		return b.String()
	}
	s := "pkcs11:token=" + enc(u.Token) + ";object=" + enc(u.Object)
	if len(u.ID) > 0 {
		s += ";id=" + enc(string(u.ID))
	}
	return s
}
