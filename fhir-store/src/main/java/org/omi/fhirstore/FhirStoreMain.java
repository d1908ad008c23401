package org.omi.fhirstore;

import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.HttpConfiguration;
import org.eclipse.jetty.server.HttpConnectionFactory;
import org.eclipse.jetty.server.SecureRequestCustomizer;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.server.SslConnectionFactory;
import org.eclipse.jetty.util.ssl.SslContextFactory;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

import java.io.IOException;
import java.nio.file.Path;

/**
 * Starts the FHIR store: binds the port first (so a port in use fails at once), builds the
 * Spring context of the JPA server, then serves FHIR R4 at /fhir.
 *
 * <p>Usage: {@code java -cp fhir-store.jar:lib/* org.omi.fhirstore.FhirStoreMain SETTINGS.properties}
 * <br>Exit 2: bad settings; exit 3: the port is in use; exit 1: anything else.
 */
public final class FhirStoreMain {
	private static final Logger log = LoggerFactory.getLogger(FhirStoreMain.class);

	private FhirStoreMain() {}

	public static void main(String[] args) throws Exception {
		if (args.length != 1) {
			System.err.println("usage: FhirStoreMain SETTINGS.properties");
			System.exit(2);
		}
		Settings s;
		try {
			s = Settings.load(Path.of(args[0]));
		} catch (IOException e) {
			System.err.println("fhir-store: cannot read settings " + args[0] + ": " + e.getMessage());
			System.exit(2);
			return;
		}
		long t0 = System.nanoTime();
		Server jetty = new Server();
		ServerConnector connector;
		try {
			connector = connector(jetty, s);
			connector.open();
		} catch (Settings.SettingsError e) {
			System.err.println("fhir-store: " + e.getMessage());
			System.exit(2);
			return;
		} catch (IOException e) {
			System.err.println("fhir-store: cannot listen on " + s.get("host", "127.0.0.1") + ":" + s.get("port", "?")
					+ " (" + e.getMessage() + ")");
			System.exit(3);
			return;
		}
		AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext();
		try {
			ctx.register(StoreConfig.class);
			ctx.refresh();
		} catch (Settings.SettingsError e) {
			System.err.println("fhir-store: " + e.getMessage());
			System.exit(2);
			return;
		}
		RestfulServer fhir = restfulServer(ctx, s);
		ServletContextHandler handler = new ServletContextHandler();
		handler.setContextPath("/");
		ServletHolder holder = new ServletHolder("fhir", fhir);
		holder.setInitOrder(1);
		handler.addServlet(holder, "/fhir/*");
		jetty.setHandler(handler);
		jetty.setStopAtShutdown(true);
		jetty.setStopTimeout(10_000);
		Runtime.getRuntime().addShutdownHook(new Thread(ctx::close, "fhir-store-spring-close"));
		jetty.start();
		long ms = (System.nanoTime() - t0) / 1_000_000;
		log.info("FHIR store ready at {}://{}:{}/fhir after {} ms", s.get("tls.keystore", null) == null ? "http" : "https",
				s.get("host", "127.0.0.1"), connector.getLocalPort(), ms);
		jetty.join();
	}

	private static ServerConnector connector(Server jetty, Settings s) throws IOException {
		String keystore = s.get("tls.keystore", null);
		ServerConnector c;
		if (keystore == null) {
			c = new ServerConnector(jetty);
		} else {
			SslContextFactory.Server ssl = new SslContextFactory.Server();
			ssl.setKeyStorePath(keystore);
			ssl.setKeyStoreType("PKCS12");
			ssl.setKeyStorePassword(s.secret("tls.keystore.password.file"));
			HttpConfiguration https = new HttpConfiguration();
			https.addCustomizer(new SecureRequestCustomizer(false));
			c = new ServerConnector(jetty, new SslConnectionFactory(ssl, "http/1.1"), new HttpConnectionFactory(https));
		}
		c.setHost(s.get("host", "127.0.0.1"));
		c.setPort(s.integer("port", 8090));
		jetty.addConnector(c);
		return c;
	}

	@SuppressWarnings({"rawtypes", "unchecked"})
	private static RestfulServer restfulServer(AnnotationConfigApplicationContext ctx, Settings s) {
		IFhirSystemDao systemDao = ctx.getBean("mySystemDaoR4", IFhirSystemDao.class);
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(ctx.getBean(ResourceProviderFactory.class).createProviders());
		server.registerProvider(ctx.getBean(JpaSystemProvider.class));
		IValidationSupport validation = ctx.getBean(IValidationSupport.class);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(server, systemDao,
				ctx.getBean(JpaStorageSettings.class), ctx.getBean(ISearchParamRegistry.class), validation));
		DatabaseBackedPagingProvider paging = ctx.getBean(DatabaseBackedPagingProvider.class);
		paging.setDefaultPageSize(s.integer("page.default", 20));
		paging.setMaximumPageSize(s.integer("page.max", 200));
		server.setPagingProvider(paging);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		if (s.bool("validation.requests", false)) {
			// Resources sent to the store are validated against the base specification and every
			// profile they claim that the store holds as a StructureDefinition; errors are refused.
			// A claimed profile the store does not hold is an error unless validation.unknown_profiles
			// is "warning" (for a store without the profiles' packages, as in the tests here).
			FhirInstanceValidator module = new FhirInstanceValidator(validation);
			module.setErrorForUnknownProfiles(!"warning".equals(s.get("validation.unknown_profiles", "error")));
			RequestValidatingInterceptor validator = new RequestValidatingInterceptor();
			validator.addValidatorModule(module);
			validator.setFailOnSeverity(ResultSeverityEnum.ERROR);
			validator.setAddResponseHeaderOnSeverity(null);
			server.registerInterceptor(validator);
		}
		return server;
	}
}
